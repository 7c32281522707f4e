/* What every extension module in csrc/ shares (rahf_serve/c_extension.py builds them; a change here
 * rebuilds them all: the build's cache key covers the headers beside a source). */
#ifndef RAHF_EXTENSION_H
#define RAHF_EXTENSION_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* The module `m` (from PyModule_Create) with its `openmp` constant, whether it was built with -fopenmp and
 * so shares its work between torch's threads; NULL if `m` is or that fails. */
static PyObject *with_openmp_flag(PyObject *m)
{
#ifdef _OPENMP
    const int openmp = 1;
#else
    const int openmp = 0;
#endif
    if (m != NULL && PyModule_AddIntConstant(m, "openmp", openmp) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

#endif
