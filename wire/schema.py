"""Write the wire contract's JSON Schemas to wire/schemas/ for other consumers.

    python -m wire.schema
"""

import json
from pathlib import Path

from wire.messages import ALL_SCHEMAS

OUT = Path(__file__).parent / "schemas"


def render() -> dict[str, str]:
    return {
        name: json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", **schema}, indent=2, ensure_ascii=False) + "\n"
        for name, schema in ALL_SCHEMAS.items()
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)


if __name__ == "__main__":
    main()
