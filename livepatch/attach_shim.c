/* Loaded into a running CPython process by `livepatch attach`.
 *
 * The loader (pyinjector, or gdb as the fallback) calls dlopen() from a
 * thread it briefly hijacked. That thread may have been stopped anywhere,
 * so the constructor does no Python work on it: it only starts a new native
 * thread and returns. The new thread enters the interpreter the documented
 * way for foreign threads (PyGILState_Ensure), so the bootstrap runs at a
 * real safe point, even while the main thread is blocked in a system call.
 *
 * The bootstrap is the file "<path of this library>.py", which the CLI wrote
 * next to it in the user's 0700 runtime directory. It runs in a fresh
 * namespace, binding nothing in the service's __main__. No Python headers
 * are needed: the few API functions are looked up in the running process. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

typedef int (*int_void_fn)(void);
typedef void (*release_fn)(int);
typedef int (*run_fn)(const char *);

static char script[8192];

static void *bootstrap(void *unused) {
    (void)unused;
    int_void_fn is_initialized = (int_void_fn)dlsym(RTLD_DEFAULT, "Py_IsInitialized");
    int_void_fn ensure = (int_void_fn)dlsym(RTLD_DEFAULT, "PyGILState_Ensure");
    release_fn release = (release_fn)dlsym(RTLD_DEFAULT, "PyGILState_Release");
    run_fn run = (run_fn)dlsym(RTLD_DEFAULT, "PyRun_SimpleString");
    if (!is_initialized || !ensure || !release || !run || !is_initialized())
        return NULL;
    int state = ensure();
    run(script);
    release(state);
    return NULL;
}

__attribute__((constructor)) static void livepatch_attach(void) {
    Dl_info info;
    if (!dladdr((void *)livepatch_attach, &info) || !info.dli_fname)
        return;
    const char *path = info.dli_fname;
    if (strpbrk(path, "'\\\n") || strlen(path) > 2000)
        return;
    snprintf(script, sizeof script,
             "(lambda: exec(compile(open('%s.py').read(), '%s.py', 'exec'), "
             "{'__name__': '__livepatch_attach__'}))()", path, path);
    pthread_attr_t attr;
    pthread_t thread;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_create(&thread, &attr, bootstrap, NULL);
    pthread_attr_destroy(&attr);
}
