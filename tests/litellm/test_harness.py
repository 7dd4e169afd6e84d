"""The proxy's environment: a failed install fails loudly, with pip's own words."""

from __future__ import annotations

import pytest

from tests.litellm.proxy import ProxyInstallFailed, proxy_python


def test_a_failed_install_raises_with_pips_error(tmp_path, monkeypatch):
    pins = tmp_path / "requirements-litellm.txt"
    pins.write_text("keyroute-no-such-package-for-tests==0.0.1\n")
    monkeypatch.setenv("KEYROUTE_LITELLM_VENV", str(tmp_path / "venv"))

    with pytest.raises(ProxyInstallFailed) as failed:
        proxy_python(pins)

    said = str(failed.value)
    assert said.startswith(f"Installing the LiteLLM proxy into {tmp_path / 'venv'} failed")
    assert "No matching distribution found for keyroute-no-such-package-for-tests==0.0.1" in said
    assert not (tmp_path / "venv" / ".complete").exists()  # the next run tries again
