"""Errors shown to users as one clear line (no traceback) by the CLI, and the exit statuses.

Every `entityclip` command exits with one of these (README, "Exit statuses"):
  0    done
  1    finished, but some work failed and is recorded as failed (explain: failed queries,
       retried by a rerun; explain-import: nothing imported)
  2    refused: bad input or a machine/storage problem, said in one line (EntityClipError)
  75   stopped early on purpose (SIGTERM, Ctrl-C, a preemption, explain's backend failing
       again and again): everything done so far is saved; rerun the same command to resume
       (EX_TEMPFAIL of sysexits.h, "try again later"; the launch scripts rerun on it)
  130  aborted at once by a second Ctrl-C (or a Ctrl-C a command cannot stop cleanly at):
       what was in flight is lost; a rerun resumes from the last save
"""

EXIT_DONE = 0
EXIT_SOME_FAILED = 1
EXIT_REFUSED = 2
EXIT_STOPPED_EARLY = 75
EXIT_ABORTED = 130


class EntityClipError(Exception):
    """Bad input the user can fix. The message says what is wrong and how to fix it."""
