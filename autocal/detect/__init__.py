"""Detection: the rules' ``match`` functions (a typed plan, or ``NoMatch`` with the reason) and the passes they run.

The table that orders the rules is ``autocal/rules.py``.
"""
