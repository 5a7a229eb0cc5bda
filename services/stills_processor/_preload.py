"""Imported for its side effect, and only by the pool's forkserver (``batch.get_pool`` names it in
``set_forkserver_preload``): the server imports DIALS once here, before it forks the pool's workers, which then
share the loaded modules copy-on-write instead of paying the ~4 s import each. Nothing else should import it."""
from .batch import warm_up

warm_up()
