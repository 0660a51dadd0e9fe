"""Build calibration modules from a detected ``MoEStructure``."""
