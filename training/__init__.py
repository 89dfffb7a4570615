"""Self-distillation training, evaluation, calibration, threshold selection and export."""
