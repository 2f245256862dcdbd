"""Write the wire contract's JSON Schemas to wire/schemas/ for other consumers.

    python -m wire.schema

The messages of wire/messages.py (tx_batch, ack, status, manifest,
deny_delta, resync, account_query, account_reply) and the rule-set format v3
(ruleset = the effective rule set, layer = one layer document, member and
deny = one record of the snapshot parts; see wire/RULESET.md). The record
bodies' schema, records.json, is written by ``python -m wire.records``.
"""

import json
from pathlib import Path

from wire.messages import ALL_SCHEMAS
from wire.ruleset import DENY_SCHEMA, LAYER_SCHEMA, MEMBER_SCHEMA, RULESET_SCHEMA

OUT = Path(__file__).parent / "schemas"

RULESET_SCHEMAS = {
    "ruleset.json": RULESET_SCHEMA,
    "layer.json": LAYER_SCHEMA,
    "member.json": MEMBER_SCHEMA,
    "deny.json": DENY_SCHEMA,
}


def render() -> dict[str, str]:
    out = {
        name: json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", **schema}, indent=2, ensure_ascii=False) + "\n"
        for name, schema in ALL_SCHEMAS.items()
    }
    # The rule-set schemas use draft 2020-12 keywords (propertyNames, const) and are validated as such.
    out.update({
        name: json.dumps({"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}, indent=2,
                         ensure_ascii=False) + "\n"
        for name, schema in RULESET_SCHEMAS.items()
    })
    return out


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)


if __name__ == "__main__":
    main()
