# nbgrader configuration: this directory is the course directory of the rankkit
# assignments. Run nbgrader commands from here, e.g.
#     cd notebooks/assignments && nbgrader generate_assignment 01_effective_rank
# See docs/teaching.md for the whole release / collect / autograde workflow.
c = get_config()  # noqa: F821 -- injected by nbgrader

c.CourseDirectory.course_id = "rankkit"
c.CourseDirectory.source_directory = "source"
c.CourseDirectory.release_directory = "release"
# Student ids are added with `nbgrader db student add ID`; the gradebook
# (gradebook.db) and the submitted/, autograded/ and feedback/ folders are
# created here and are not committed (see .gitignore).

# Every notebook runs in well under two minutes on a laptop; this is a safety net.
c.ExecutePreprocessor.timeout = 600
