"""Stock batch prediction: SQL bars -> 105 features -> 60-day windows -> torch model -> SQL."""
