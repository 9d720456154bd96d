"""The stages of a build (design §3): :mod:`.collect` → :mod:`.select` → :mod:`.train`.

:mod:`.run` checks every input of a command before anything is written (``preflight``) and then
runs its stages in order (``execute``); :mod:`.objectives` is the table of training objectives.
"""
