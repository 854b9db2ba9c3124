"""The one rule for names users choose (tenants, keys, adapters): short, plain, safe in URLs and logs."""

from __future__ import annotations

from typing import Annotated

import msgspec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_RULE = "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, min_length=1, max_length=64, description=NAME_RULE)]
