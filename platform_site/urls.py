from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

admin.site.site_header = "Keyroute"
admin.site.site_title = "Keyroute admin"
admin.site.index_title = "Credentials and routes"

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="playground", permanent=False)),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("", include("llm.urls")),
]
