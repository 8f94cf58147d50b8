"""When a task is worth retrying: one rule for every task (stdlib only, so light modules can use it)."""

from __future__ import annotations


def retry_on(*transient: type[BaseException], never: tuple[type[BaseException], ...] = ()):
    """A Prefect ``retry_condition_fn`` that retries the ``transient`` exceptions only.

    Bad input (``never``, checked first) and every other exception are final: they will
    not get better on a second try.
    """
    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except never:
            return False
        except transient:
            return True
        except Exception:  # noqa: BLE001 - any other failure is final
            return False
        return False

    return condition
