"""Terminal output: web text never reaches the terminal raw."""

from __future__ import annotations

import io

import pandas as pd
from rich.console import Console

from dedup.console import identity_warnings, print_top, terminal_safe


def test_control_characters_become_visible_escapes():
    assert terminal_safe("a\x1b[31mb\x07c\x9bd\u202ee\tf\nok") == "a\\x1b[31mb\\x07c\\x9bd\\u202ee\\x09f\\x0aok"
    assert terminal_safe("caf\u00e9 \u6771\u4eac") == "caf\u00e9 \u6771\u4eac"  # printable text is untouched


def test_top_table_escapes_keys_and_captions():
    ranking = pd.DataFrame({"rank": [1], "copies": [3], "distinct_captions": [1], "url_domains": [1], "shards_spanned": [1],
                            "representative_key": ["k\x1b]0;owned\x07"], "representative_caption": ["\x1b[2J\x1b[31mred"]})
    buffer = io.StringIO()
    print_top(ranking, Console(file=buffer, force_terminal=True, color_system="standard", width=200))
    text = buffer.getvalue()
    assert "\x1b]0;owned" not in text and "\x1b[2J" not in text and "\x1b[31mred" not in text
    assert "\\x1b[31mred" in text


def test_identity_warnings_name_each_kind():
    lines = identity_warnings({"keys.repeated_in_shard": 2, "members.repeated": 1, "keys.in_several_shards": 5})
    assert len(lines) == 3 and "2 samples repeat a key" in lines[0] and "5 keys occur in more than one shard" in lines[2]
    assert identity_warnings({"samples": 3}) == []
