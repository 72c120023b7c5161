"""``clustersync run``: the supervisor, each worker's boot, the command line and shared sockets."""
