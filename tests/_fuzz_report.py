"""The fuzz tests' one-line report (runtime, what was drawn), printed past pytest's capture."""


def print_uncaptured(request, line):
    """Print ``line`` even under output capture, so CI logs show each fuzz test's runtime."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        print(line)
