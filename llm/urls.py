from __future__ import annotations

from django.urls import path

from llm import metrics, views

urlpatterns = [
    path("llm/", views.playground, name="playground"),
    path("llm/send", views.playground_send, name="playground-send"),
    path("api/llm/credentials", views.credentials_api, name="api-credentials"),
    path("api/llm/chat", views.chat_api, name="api-chat"),
    path("api/llm/embeddings", views.embeddings_api, name="api-embeddings"),
    path("api/llm/models", views.models_api, name="api-models"),
    path("api/llm/budget", views.budget_api, name="api-budget"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
]
