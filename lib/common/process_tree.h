// A worker's process tree, without cgroups: the worker leads its own process group and is a child
// subreaper (PR_SET_CHILD_SUBREAPER), so that whatever its tasks start stays below it even when
// an intermediate parent exits (a double fork): orphans are reparented to the worker, not to init.
// While the worker lives, every descendant can therefore be found through /proc (each process's
// parent) and killed, setsid daemons included; once it has died, only its process group can be.
//
// Where the worker also has a cgroup (cgroup.h), that is what stops its tree; this is the
// fallback and the worker's own clean-up when it leaves.

#ifndef PROCPOOL_LIB_COMMON_PROCESS_TREE_H_
#define PROCPOOL_LIB_COMMON_PROCESS_TREE_H_

#include <sys/types.h>

#include <string>
#include <vector>

namespace procpool::internal {

// In a worker just forked: leads a process group of its own and becomes a child subreaper.
void become_tree_root();

// In a worker that is its tree's root (after become_tree_root and joining its cgroups, whose
// cgroup.procs files are `cgroup_procs`) and that dies with its parent (PR_SET_PDEATHSIG, set by
// prepare_child): the parent's death kills the whole tree, not only the worker. A parent that is
// SIGKILLed (kill -9, the OOM killer) cannot stop its workers' trees itself: the SIGKILL the
// worker got as its death signal left what its task started running (reparented to init). The
// death signal becomes tree_death_signal(), whose handler (system calls only: the task may be
// anywhere, in malloc too) kills the worker's cgroup (v2 cgroup.kill, or each member of its
// cgroup.procs), every descendant (orphans come to the worker as their subreaper), its process
// group, and the worker itself. Does nothing where no death signal is set. A task that blocks
// or takes over that signal keeps its worker alive past its parent until the task returns (the
// worker then finds its channel closed, ends its tree and leaves).
void end_tree_with_parent(const std::vector<std::string>& cgroup_procs);

// The signal a worker's parent's death sends it once end_tree_with_parent ran (a real-time
// signal: no program's own handler is likely to take it).
int tree_death_signal();

// SIGKILLs every living descendant of `root` (not `root` itself), again and again until none is
// left alive (those that fork as they die are found on the next pass), for at most about 100 ms.
// Returns how many processes were signalled.
int kill_descendants(pid_t root);

// In a worker about to exit: kills every descendant it still has and reaps its children (its own
// and those reparented to it), so that nothing it started outlives it, not even as a zombie.
void end_own_tree();

// In a living worker, between its tasks: reaps every child that has exited and that nothing
// waited for. As its tree's subreaper it is handed the orphans of whatever its tasks started (a
// `system("tool &")`, a daemon's double fork); unreaped, each would stay a zombie for as long as
// the worker lives. A child that a task started and left is reaped too, once it has exited: code
// that waits for a child after the task that started it returned (in a later task, or in exit())
// must expect to find it reaped (ECHILD) if it exited meanwhile. Returns true while children are
// left (living ones), false when there are none. Never blocks.
bool reap_exited_children();

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_PROCESS_TREE_H_
