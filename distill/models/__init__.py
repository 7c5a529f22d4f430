"""Loading teachers, students and tokenizers; building students cut from a teacher."""
