"""Reading model files (local or from the hub) for the estimates."""
