"""Bootstrapping a rack: the playbooks through ansible-runner."""
