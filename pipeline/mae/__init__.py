"""MAE pretraining with random or semantic-guided masking (SemMAE; docs/method.md)."""
