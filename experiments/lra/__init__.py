"""Long Range Arena tasks: data loaders, generators, models, training and summaries."""
