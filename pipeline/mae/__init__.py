"""MAE pretraining with random or semantic-guided masking (SemMAE, METHOD.md Stages 2-3)."""
