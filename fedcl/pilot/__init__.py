"""The multi-site pilot: certificates and site keys, the SuperLink and sites as processes, runs, a local proof of concept."""
