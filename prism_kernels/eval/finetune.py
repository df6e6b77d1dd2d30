"""Fine-tuning with Prism in the loop (filled in below)."""
FINETUNE_TASKS = {}


def run_finetune(name, args):
    raise NotImplementedError
