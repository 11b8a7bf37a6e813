"""What a Trainer needs around it: hardware choices, callbacks, checkpoint safety, TensorBoard extras."""
