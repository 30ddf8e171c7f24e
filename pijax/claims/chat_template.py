"""The default model's chat template (`chat_template.jinja` beside its tokenizer), generated from
the claim-review prompt format of `pijax.claims.prompt`, so that OpenAI chat requests render to
exactly the prompts the model was trained on:

    <bos><|policy|>{system message, or the policy scaffold}\\n<|claim|>{user}\\n<|review|>

Each user message is one claim, each assistant message one findings JSON (closed by `<|end|>`).
The policy scaffold is written into the template as the default system message, so a template
is tied to the scaffold its model was trained with: whoever changes the scaffold and retrains
regenerates it (`scripts/train_default_model.py` output directory):

    python -m pijax.claims.chat_template pijax/data/default_model
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pijax.claims.prompt import CLAIM, END, POLICY, REVIEW, policy_scaffold

TEMPLATE_FILE = "chat_template.jinja"


def default_model_chat_template(policy_text: str | None = None) -> str:
    policy = policy_scaffold() if policy_text is None else policy_text
    nl = "{{ '\\n' }}"
    return (
        "{#- pijax default claim-review model: the prompt format of pijax.claims.prompt, generated"
        " by pijax/claims/chat_template.py.\n"
        "    A system message is the policy text (default: the policy scaffold the model was"
        " trained on);\n"
        "    each user message is one claim; each assistant message is one findings JSON. -#}\n"
        f"{{%- set default_policy = {json.dumps(policy)} -%}}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "{%- set policy = messages[0]['content'] -%}\n"
        "{%- set turns = messages[1:] -%}\n"
        "{%- else -%}\n"
        "{%- set policy = default_policy -%}\n"
        "{%- set turns = messages -%}\n"
        "{%- endif -%}\n"
        f"{{{{- bos_token }}}}{POLICY}{{{{ policy }}}}{nl}\n"
        "{%- for m in turns -%}\n"
        "{%- if m['role'] == 'user' -%}\n"
        f"{CLAIM}{{{{ m['content'] }}}}{nl}\n"
        "{%- elif m['role'] == 'assistant' -%}\n"
        f"{REVIEW}{{{{ m['content'] }}}}{END}\n"
        "{%- else -%}\n"
        '{{- raise_exception("roles after the first message must be user or assistant; got "'
        " ~ m['role']) }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        f"{REVIEW}\n"
        "{%- endif -%}\n"
    )


def write_chat_template(model_dir: str | Path) -> Path:
    path = Path(model_dir) / TEMPLATE_FILE
    path.write_text(default_model_chat_template(), encoding="utf-8")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pijax.claims.chat_template MODEL_DIR")
    print(write_chat_template(sys.argv[1]))
