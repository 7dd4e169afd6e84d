"""Settings for the server of tests/site/test_isolation.py: the site's own, with an admin
page that is slow on purpose (tests/site/slow_urls.py)."""

from platform_site.settings import *  # noqa: F403

ROOT_URLCONF = "tests.site.slow_urls"
