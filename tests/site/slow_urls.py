"""The site's URLs plus a staff page that is slow on purpose, for tests/site/test_isolation.py.

The page is a plain sync view, as every admin page is: it holds its request's thread for
SLOW_SECONDS. It first creates the file named by KEYROUTE_SLOW_MARKER, so that the test
knows the page is in flight before it measures the other requests.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import path

import platform_site.urls

MARKER = "KEYROUTE_SLOW_MARKER"
SLOW_SECONDS = 8.0


def slow_page(request: HttpRequest) -> HttpResponse:
    Path(os.environ[MARKER]).touch()
    time.sleep(SLOW_SECONDS)
    return HttpResponse("Slow on purpose, and done.", content_type="text/plain")


urlpatterns = [
    # Before the admin's own URLs, which would answer 404 for it.
    path("admin/slow/", admin.site.admin_view(slow_page), name="slow-admin-page"),
    *platform_site.urls.urlpatterns,
]
