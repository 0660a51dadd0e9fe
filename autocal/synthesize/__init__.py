"""Build calibration modules from a rule's plan (``autocal/detect/plans.py``): one builder per rule."""
