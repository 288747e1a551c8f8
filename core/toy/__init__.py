"""The trained toy model of the shapes world: architecture, training, check, build, ship."""
