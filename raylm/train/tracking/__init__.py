"""Experiment trackers that rank 0 sends each metrics row to (TensorBoard, MLflow, W&B), behind one interface."""
