cdef int check_status(int code, str detail=*) except -1
