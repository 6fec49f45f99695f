"""Every script's --help lists every flag with its help text and its default."""
import re

import pytest

import fewshot
import prepare_data
import pretrain
import transfer


def help_blocks(parser):
    """flag -> its entry in --help (whitespace collapsed)."""
    blocks, current = {}, None
    for line in parser.format_help().splitlines():
        m = re.match(r"\s{2}(--?[\w-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith(" " * 4):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.mark.parametrize("script", [prepare_data, pretrain, transfer, fewshot],
                         ids=lambda m: m.__name__)
def test_help_lists_every_flag_with_its_default(script):
    parser = script.get_args_parser()
    blocks = help_blocks(parser)
    flags = [a for a in parser._actions if a.dest != "help"]
    assert len(flags) >= 10
    for action in flags:
        entry = blocks[action.option_strings[0]]
        assert action.help and len(entry) > len(" ".join(action.option_strings)) + 15, entry
        # argparse's "(default: X)", or the help's own words where the default needs a sentence
        assert "(default: " in entry or "default" in action.help, entry
