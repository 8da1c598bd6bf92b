"""Evaluation metrics as their papers define them: survival (C-index, time-dependent AUC, Brier score, log-rank),
binary outcomes (AUROC, AUPRC) and bootstrap confidence intervals. numpy only; nothing here knows about models."""
