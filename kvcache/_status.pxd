cdef int check_status(int code, str detail=*, int err=*, object filename=*) except -1
