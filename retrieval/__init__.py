"""Floor 3: prompt → ranked adapters (weight features, encoders, zero-shot scorer, hybrid ranking)."""
