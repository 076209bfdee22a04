"""hpcdistill: resolution-based knowledge distillation for histology (DiPalma et al.)."""

__version__ = "0.1.0"
