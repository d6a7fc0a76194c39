"""Input documents: the models config and the cluster file, parsed and checked."""
