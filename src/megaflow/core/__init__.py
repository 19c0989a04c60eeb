"""Types and errors shared by every role."""
