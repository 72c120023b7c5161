"""Small apps for the runner's end-to-end tests (``python -m clustersync run tests.apps.X:Y``)."""
