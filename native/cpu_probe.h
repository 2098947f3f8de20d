/* What the kernel families' run-time detection shares: the switches that turn
 * a family off, and a probe run once per process. */
#ifndef PYFORGE_CPU_PROBE_H
#define PYFORGE_CPU_PROBE_H

#include <stdlib.h>
#include <string.h>

/* An environment switch such as PYFORGE_DISABLE_AMX: set, not empty, not "0". */
static inline int pf_env_flag(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

/* probe()'s answer, computed on the first call and kept in *state (-1 before);
 * racing first calls compute the same answer. */
static inline int pf_probe_once(int *state, int (*probe)(void)) {
    int s = __atomic_load_n(state, __ATOMIC_ACQUIRE);
    if (s < 0) {
        s = probe();
        __atomic_store_n(state, s, __ATOMIC_RELEASE);
    }
    return s;
}

#endif
