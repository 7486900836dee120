"""The console's forms; Flask-WTF adds the CSRF token to each."""

from __future__ import annotations

import json
from typing import Any

from flask_wtf import FlaskForm
from wtforms import (
    HiddenField,
    IntegerField,
    PasswordField,
    SelectField,
    StringField,
    TextAreaField,
)
from wtforms.validators import DataRequired, EqualTo, InputRequired, Length

from console.services import MAX_PASSWORD, MIN_PASSWORD, Role
from engine.errors import InvalidInput
from engine.inputs import MAX_INT32, parse_int
from engine.operations import MAX_REASON, check_json

ROLE_CHOICES = [r.value for r in Role]
#: JSON typed into a form longer than this is refused (the audit log keeps it too).
MAX_JSON_TEXT = 200_000


class LoginForm(FlaskForm):
    name = StringField("User name", validators=[DataRequired(), Length(max=150)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=MAX_PASSWORD)])
    next = HiddenField()


class WholeNumberField(IntegerField):
    """A whole number in ASCII digits from ``low`` to ``high`` (:func:`engine.inputs.parse_int`);
    anything else (``²``, ``1e3``, 5,000 digits) is an error on the field."""

    data: Any  # the number, or None when missing or refused (wtforms is untyped)

    def __init__(self, *args: Any, low: int = 0, high: int = MAX_INT32, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.low, self.high = low, high

    def process_formdata(self, valuelist: list[Any]) -> None:
        if not valuelist:
            return
        try:
            self.data = parse_int(self.name, str(valuelist[0]), low=self.low, high=self.high)
        except InvalidInput as exc:
            self.data = None
            raise ValueError(exc.problem) from None


class ActionForm(FlaskForm):
    """An operator action: why, and the version of the instance the operator saw."""

    reason = TextAreaField(
        "Reason (goes in the audit log)",
        validators=[DataRequired("Say why you are doing this."), Length(max=MAX_REASON)],
    )
    expected_version = WholeNumberField(
        validators=[InputRequired("The form lost the version you saw; reload the saga.")],
        low=1,
    )


class JSONField(TextAreaField):
    """Optional JSON text: ``data`` is the parsed value, None when left empty.

    Text that is not JSON, or JSON the store cannot keep (NaN, a NUL
    character), is an error on the field; the page shows the text as typed.
    """

    def process_formdata(self, valuelist: list[Any]) -> None:
        self.data = None
        text = valuelist[0] if valuelist else ""
        if text.strip():
            self.data = parse_json(text)

    def _value(self) -> str:
        return str(self.raw_data[0]) if self.raw_data else ""


def parse_json(text: str) -> Any:
    """``text`` as a JSON value the store can keep; a ValueError says what is wrong and where."""
    if len(text) > MAX_JSON_TEXT:
        raise ValueError(f"it is {len(text):,} characters; the limit is {MAX_JSON_TEXT:,}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"it is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except ValueError:  # a number past int()'s 4,300 digits
        raise ValueError("a number in it has too many digits") from None
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    try:
        check_json(value)
    except InvalidInput as exc:
        raise ValueError(f"the store cannot keep it: {exc.problem}") from None
    return value


class SignalForm(ActionForm):
    """A signal an operator sends to a waiting step: its data, why, and the version seen."""

    signal_data = JSONField("Data (JSON, optional): what the waiting step records as its output")


class AddUserForm(FlaskForm):
    name = StringField("User name", validators=[DataRequired(), Length(max=150)])
    role = SelectField("Role", choices=ROLE_CHOICES, default=Role.VIEWER.value)
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(min=MIN_PASSWORD, max=MAX_PASSWORD)]
    )


class ChangePasswordForm(FlaskForm):
    """A signed-in user's own new password: the current one first, the new one twice."""

    current_password = PasswordField(
        "Current password", validators=[DataRequired(), Length(max=MAX_PASSWORD)]
    )
    new_password = PasswordField(
        "New password", validators=[DataRequired(), Length(min=MIN_PASSWORD, max=MAX_PASSWORD)]
    )
    confirm_password = PasswordField(
        "New password again",
        validators=[DataRequired(), EqualTo("new_password", "The two new passwords differ.")],
    )


class RoleForm(FlaskForm):
    role = SelectField("Role", choices=ROLE_CHOICES)


class PostForm(FlaskForm):
    """A button that only needs the CSRF token (sign out, disable a user)."""
