"""Who may read which room."""

MEMBERS = {"ops": {"alice", "bob"}, "payroll": {"carol"}, "lobby": None}  # None: public


def can_read(user, room):
    members = MEMBERS.get(room)
    if members is None:
        return room in MEMBERS
    return user in members  # members only
