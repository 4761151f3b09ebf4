"""Never returns and never steps (an audit must end it at --timeout)."""

import time

import torch  # noqa: F401

while True:
    time.sleep(1)
