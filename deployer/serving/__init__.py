"""Side effects on a Ray cluster: probe its GPUs, launch and watch the engines."""
