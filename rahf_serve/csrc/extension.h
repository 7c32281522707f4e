/* What the extension modules in csrc/ share (rahf_serve/c_extension.py builds them; a change here
 * rebuilds them all: the build's cache key covers the headers beside a source). */
#ifndef RAHF_EXTENSION_H
#define RAHF_EXTENSION_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* A METH_FASTCALL function's arguments: `ints` ints (addresses and sizes) into i, then `floats` floats into
 * f. The Python side owns every address and shape: nothing is checked here but the count and the types.
 * Returns -1 with a TypeError set when they do not fit. */
static int parse_args(PyObject *const *args, Py_ssize_t nargs, const char *name, Py_ssize_t ints,
                      Py_ssize_t floats, int64_t *i, double *f)
{
    if (nargs != ints + floats) {
        if (floats)
            PyErr_Format(PyExc_TypeError, "%s takes %zd ints and %zd floats (%zd arguments given)", name, ints,
                         floats, nargs);
        else
            PyErr_Format(PyExc_TypeError, "%s takes %zd ints (%zd given)", name, ints, nargs);
        return -1;
    }
    for (Py_ssize_t k = 0; k < ints; k++) {
        i[k] = PyLong_AsLongLong(args[k]);
        if (i[k] == -1 && PyErr_Occurred())
            return -1;
    }
    for (Py_ssize_t k = 0; k < floats; k++) {
        f[k] = PyFloat_AsDouble(args[ints + k]);
        if (f[k] == -1.0 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* A LoRA site's rows added to a product's output: lora_rows exports its site call as one of these (the
 * int `site_function`) and forward_ops' products call it after the product, in C, so a decode step makes
 * one call from Python per product, not two. Nonzero when it did the rows (or there were none); 0 when it
 * did nothing and the caller must take its own path. */
typedef int (*rahf_site_fn)(const void *site, int64_t total, const float *x, int64_t ldx, float *y,
                            int64_t ldy);

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
