"""Built-in trainers and the training side."""
