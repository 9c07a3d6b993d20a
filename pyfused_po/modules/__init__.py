"""The nn.Modules users hold: configuration plus dispatch to a plan.

FusedPreferenceLoss (preference.py), FusedKTOLoss (kto.py) and EXPO's entry points (expo.py).
"""
