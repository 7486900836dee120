"""The console's forms; Flask-WTF adds the CSRF token to each."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import (
    HiddenField,
    IntegerField,
    PasswordField,
    SelectField,
    StringField,
    TextAreaField,
)
from wtforms.validators import DataRequired, InputRequired, Length, NumberRange

from engine.operations import MAX_REASON
from engine.users import MAX_PASSWORD, MIN_PASSWORD, Role

ROLE_CHOICES = [r.value for r in Role]


class LoginForm(FlaskForm):
    name = StringField("User name", validators=[DataRequired(), Length(max=150)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=MAX_PASSWORD)])
    next = HiddenField()


class ActionForm(FlaskForm):
    """An operator action: why, and the version of the instance the operator saw."""

    reason = TextAreaField(
        "Reason (goes in the audit log)",
        validators=[DataRequired("Say why you are doing this."), Length(max=MAX_REASON)],
    )
    expected_version = IntegerField(
        validators=[
            InputRequired("The form lost the version you saw; reload the saga."),
            NumberRange(min=1),
        ],
    )


class AddUserForm(FlaskForm):
    name = StringField("User name", validators=[DataRequired(), Length(max=150)])
    role = SelectField("Role", choices=ROLE_CHOICES, default=Role.VIEWER.value)
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(min=MIN_PASSWORD, max=MAX_PASSWORD)]
    )


class RoleForm(FlaskForm):
    role = SelectField("Role", choices=ROLE_CHOICES)


class PostForm(FlaskForm):
    """A button that only needs the CSRF token (sign out, disable a user)."""
