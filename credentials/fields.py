"""Model fields for credentials: an encrypted API key and a policed base URL."""

from __future__ import annotations

import re
import weakref
from typing import Any

from django import forms
from django.core.exceptions import FieldError, ValidationError
from django.db import connections, models
from django.db.models.query_utils import DeferredAttribute

from credentials import crypto
from credentials.policy import normalize_base_url, validate_base_url
from credentials.secret import Secret, hint_for


class EncryptedSecret(Secret):
    """A key as stored: a Fernet token, decrypted only when the plaintext is asked for.

    Loading a row decrypts nothing, so list pages and bulk reads cost no cryptography.
    Pickling keeps the token only.
    """

    __slots__ = ("_owner", "_plaintext", "token")

    def __init__(self, token: str, *, plaintext: str | None = None) -> None:
        self.token = token
        self._plaintext = plaintext
        self._owner: weakref.ref[models.Model] | None = None

    def bind(self, owner: models.Model) -> None:
        self._owner = weakref.ref(owner)

    def describe_owner(self) -> str:
        owner = self._owner() if self._owner else None
        if owner is None:
            return "A stored API key"
        return f"The API key of credential {str(owner)!r} (id {owner.pk})"

    def get_secret_value(self) -> str:
        if self._plaintext is None:
            try:
                self._plaintext = crypto.decrypt(self.token)
            except crypto.DecryptionError:
                raise crypto.DecryptionError(crypto.undecryptable(self.describe_owner())) from None
        return self._plaintext

    def __bool__(self) -> bool:
        return bool(self.token)

    def __reduce__(self) -> Any:
        return (EncryptedSecret, (self.token,))


class EncryptedKeyDescriptor(DeferredAttribute):
    """Turns an assigned plain string into a Secret and keeps the key hint in step."""

    field: EncryptedKeyField

    def __set__(self, instance: models.Model, value: object) -> None:
        if isinstance(value, str):
            value = Secret(value)
        if isinstance(value, EncryptedSecret):
            value.bind(instance)
        elif isinstance(value, Secret) and self.field.hint_field:
            instance.__dict__[self.field.hint_field] = hint_for(value.get_secret_value())
        instance.__dict__[self.field.attname] = value


def is_new_key(value: object) -> bool:
    """Whether `value` is a key entered on this instance (a plain Secret, encrypted when
    saved), not the stored token that was loaded (or copied) as an EncryptedSecret."""
    return isinstance(value, Secret) and not isinstance(value, EncryptedSecret) and bool(value)


class APIKeyFormField(forms.CharField):
    """A password box that never renders the stored key; blank means unchanged."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("max_length", None)
        kwargs["widget"] = forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"})
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        return None if isinstance(value, Secret) else value

    def has_changed(self, initial: Any, data: Any) -> bool:
        return bool(data)


INTEGER = re.compile(r"-?[0-9]{1,20}")


class KeyChoiceField(forms.ModelChoiceField):  # type: ignore[type-arg]
    """A choice of a row by its key, where a value that cannot be a key is a form error.

    Django's field only catches what the database lookup raises, and re-rendering the
    form shows the submitted value again: the admin's autocomplete widget filters
    `pk__in=[value]` with it, so words, NUL or a number beyond the column (OverflowError
    on SQLite) made the page a 500. Here such a value never reaches a query: it is
    refused as "Select a valid choice", and the form shows nothing selected instead.
    """

    def _rows(self) -> models.QuerySet[Any]:
        assert self.queryset is not None  # a ModelChoiceField always has one
        return self.queryset

    def _target(self) -> models.Field[Any, Any]:
        opts = self._rows().model._meta
        field = opts.get_field(self.to_field_name) if self.to_field_name else opts.pk
        assert isinstance(field, models.Field)
        return field

    def is_key(self, value: Any) -> bool:
        """Whether `value` is a well-formed key of the target column (it may not exist)."""
        if isinstance(value, self._rows().model):
            return True
        text = str(value)
        if "\x00" in text:
            return False
        field = self._target()
        if isinstance(field, models.IntegerField):
            if not INTEGER.fullmatch(text):
                return False
            ops = connections[self._rows().db].ops
            low, high = ops.integer_field_range(field.get_internal_type())
            number = int(text)
            return (low is None or number >= low) and (high is None or number <= high)
        try:
            field.to_python(text)
        except (ValidationError, ValueError, TypeError):
            return False
        return True

    def to_python(self, value: Any) -> Any:
        if value not in self.empty_values and not self.is_key(value):
            raise ValidationError(
                self.error_messages["invalid_choice"],
                code="invalid_choice",
                params={"value": value},
            )
        return super().to_python(value)

    def bound_data(self, data: Any, initial: Any) -> Any:
        data = super().bound_data(data, initial)
        if data in self.empty_values or self.is_key(data):
            return data
        return None


class EncryptedKeyField(models.TextField[str | Secret, Secret]):
    """Stores only a Fernet token; reads back an EncryptedSecret.

    Assign a plain string (or a Secret) to set a new key; it is encrypted on save.
    Lookups are refused: the ciphertext is randomised, so comparing it means nothing.
    """

    descriptor_class = EncryptedKeyDescriptor

    def __init__(self, *args: Any, hint_field: str | None = None, **kwargs: Any) -> None:
        self.hint_field = hint_field
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        if self.hint_field:
            kwargs["hint_field"] = self.hint_field
        return name, path, args, kwargs

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> Secret | None:
        return None if value is None else EncryptedSecret(value)

    def to_python(self, value: Any) -> Any:
        # A bare string reaching to_python comes from a fixture or a serializer: a token.
        if isinstance(value, str):
            return EncryptedSecret(value)
        return value

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        value = getattr(model_instance, self.attname)
        if isinstance(value, Secret) and not isinstance(value, EncryptedSecret):
            plaintext = value.get_secret_value()
            value = EncryptedSecret(crypto.encrypt(plaintext), plaintext=plaintext)
            setattr(model_instance, self.attname, value)
        return value

    def get_prep_value(self, value: Any) -> Any:
        if isinstance(value, EncryptedSecret):
            return value.token
        if isinstance(value, Secret):
            return crypto.encrypt(value.get_secret_value())
        if isinstance(value, str):
            return crypto.encrypt(value)
        return value

    def value_to_string(self, obj: models.Model) -> str:
        value = self.value_from_object(obj)
        return str(self.get_prep_value(value) or "")

    def get_lookup(self, lookup_name: str) -> Any:
        if lookup_name == "isnull":
            return super().get_lookup(lookup_name)
        raise FieldError(
            f"{self.name} cannot be queried ({lookup_name!r}): it is encrypted with a random "
            "nonce, so equal keys never compare equal in the database."
        )

    def get_transform(self, lookup_name: str) -> Any:
        return self.get_lookup(lookup_name)

    def formfield(self, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().formfield(**{"form_class": APIKeyFormField, **kwargs})

    def validate(self, value: Any, model_instance: models.Model | None) -> None:
        if not self.blank and isinstance(value, Secret) and not value:
            raise ValidationError(self.error_messages["blank"], code="blank")
        super().validate(value, model_instance)

    def save_form_data(self, instance: models.Model, data: Any) -> None:
        # A blank key field on an edit form keeps the stored key.
        if data:
            setattr(instance, self.name, data)


class BaseURLField(models.CharField[str, str]):
    """A base URL under the credentials' policy, normalised (no trailing slash)."""

    default_validators = [validate_base_url]

    def to_python(self, value: Any) -> Any:
        value = super().to_python(value)
        return normalize_base_url(value) if isinstance(value, str) else value


MODEL_NAME_LENGTH = 200
# What a model name or pattern may not hold: spaces, commas (the list's separators) and
# control characters.
_NOT_IN_A_NAME = re.compile(r"[\s,\x00-\x1f\x7f]")


def model_names(text: str) -> list[str]:
    """Names and patterns from text, one per line or separated by commas; in order, once."""
    return list(dict.fromkeys(name.strip() for name in re.split(r"[\n,]", text) if name.strip()))


class ModelListFormField(forms.CharField):
    """Model names and `*` patterns in a text box, one per line (or separated by commas)."""

    widget = forms.Textarea(attrs={"rows": 4, "cols": 40, "spellcheck": "false"})

    def prepare_value(self, value: Any) -> Any:
        return "\n".join(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        if isinstance(value, list):
            return value
        names = model_names(super().to_python(value) or "")
        bad = [name for name in names if _NOT_IN_A_NAME.search(name)]
        if bad:
            raise ValidationError(
                f"Not a model name: {bad[0]!r}. Write one name or pattern per line, without "
                "spaces or control characters."
            )
        if long := [name for name in names if len(name) > MODEL_NAME_LENGTH]:
            raise ValidationError(
                f"A model name is at most {MODEL_NAME_LENGTH} characters: {long[0][:40]!r}... "
                "is longer."
            )
        return names


class ModelListField(models.JSONField):
    """A list of model names and `*` patterns (credentials' allow-lists); [] when empty."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default", list)
        super().__init__(*args, **kwargs)

    def validate(self, value: Any, model_instance: Any) -> None:
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            raise ValidationError("A list of model names.")
        super().validate(value, model_instance)

    def formfield(self, **kwargs: Any) -> Any:  # type: ignore[override]
        # Field's own formfield: JSONField's would give a JSON text box.
        return models.Field.formfield(self, **{"form_class": ModelListFormField, **kwargs})
