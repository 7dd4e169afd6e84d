from __future__ import annotations

from django.dispatch import Signal

# Sent by rotate_credential_keys after each batch, with `pks`: the re-encrypted rows.
# bulk_update sends no post_save, and code that caches per credential listens here.
credentials_rotated = Signal()
